"""Applications built on the `petl_modules` library: benchmark and recipe timing, report, sweep, parameter
summary, the demo with its pretraining and speech synthesizer, generated datasets in the official layouts, and
the recipes' command lines. The library never imports this package.
"""
