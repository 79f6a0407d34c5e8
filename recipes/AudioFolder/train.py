#!/usr/bin/env python3
"""Your own labelled audio: class sub-folders or a CSV path,label[,split]; the classes come from the data.

    python train.py hparams/<method>.yaml --data_folder=DIR --output_folder=DIR [--backbone_source=HUB_ID_OR_DIR]
        [--backbone=wav2vec2] [--csv_file=FILE] [--valid_list=FILE] [--test_list=FILE] [--valid_fraction=F]
        [--test_fraction=F] [--split_seed=N] [--few_shot_samples=K] [--any_yaml_key=value] [SpeechBrain options]

(from this folder, or from the repository root with recipes/AudioFolder/ before both paths; multi-GPU: torchrun).
See README.md beside this file for the layouts and the split, and the repository's README for the shared options.
Unlike the other recipes, the data is prepared before the model is built: `num_classes` (null in
hparams/audiofolder.yaml) becomes the prepared data's class count, and the run's hyperparams.yaml records it.
"""

import sys

import speechbrain as sb
from audiofolder_prepare import prepare_audiofolder

from petl_modules.recipe import Experiment, build_datasets, input_loader, recipe_errors
from petl_modules.training import BASE_METRICS, PETLBrain, extra_train_loggers

DATASET = "AudioFolder"
FOLDS = ()  # one split: the CSV's, the split lists' or the seeded stratified one
METRICS = BASE_METRICS
PREPARE_OPTIONS = ("csv_file", "valid_list", "test_list", "valid_fraction", "test_fraction", "split_seed")

if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    sb.utils.distributed.ddp_init_group(run_opts)  # torchrun: one process per device

    with recipe_errors(DATASET):  # a wrong option, file or data folder: one line, exit status 1
        # Settings checked (and reruns of finished folds found) before anything is written.
        experiment = Experiment(DATASET, hparams_file, overrides, run_opts, folds=FOLDS, metrics=METRICS)
        for fold in experiment.folds_to_run():
            sb.create_experiment_directory(experiment_directory=str(experiment.run_folder(fold)))

            # Data preparation first, on the main process only: classes.txt fixes the label order and, with
            # num_classes null, the class count of the model built next.
            manifests = experiment.prepare(prepare_audiofolder, experiment.fold_settings(fold), fold, PREPARE_OPTIONS)
            hparams = experiment.load_hparams(fold)
            experiment.record_hyperparams(fold)
            datasets = build_datasets(manifests, input_loader(hparams, experiment.feature_cache_folder))

            brain = PETLBrain(
                modules={"model": hparams["model"]},
                opt_class=hparams["opt_class"],
                hparams=hparams,
                run_opts=run_opts,
                checkpointer=hparams["checkpointer"],
                metrics=METRICS,
                extra_loggers=extra_train_loggers(hparams),
            )
            brain.fit(
                hparams["epoch_counter"],
                datasets["train"],
                datasets["valid"],
                train_loader_kwargs=hparams["train_dataloader_options"],
                valid_loader_kwargs=hparams["test_dataloader_options"],
            )
            brain.evaluate(
                datasets["test"],
                max_key=hparams["selection_metric"],
                test_loader_kwargs=hparams["test_dataloader_options"],
            )
            experiment.finish_fold(fold, brain, manifests)
        experiment.write_results()
