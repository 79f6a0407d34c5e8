#!/usr/bin/env python3
"""IEMOCAP 4-class emotion recognition, 10 speaker folds; also reports unweighted accuracy (mean per-class recall).

    python train.py hparams/<method>.yaml --data_folder=DIR --output_folder=DIR [--backbone_source=HUB_ID_OR_DIR]
        [--backbone=wav2vec2] [--fold=all|K] [--few_shot_samples=K] [--any_yaml_key=value] [SpeechBrain options]

(from this folder, or from the repository root with recipes/IEMOCAP/ before both paths; multi-GPU: torchrun).
See README.md beside this file for the protocol, and docs/recipes.md for the shared options.
"""

import shutil
import sys
from pathlib import Path

import speechbrain as sb
from iemocap_prepare import prepare_iemocap
from speechbrain.utils.distributed import ddp_barrier, run_on_main

from petl_modules.data import IEMOCAP_NUM_FOLDS
from petl_modules.recipe import RecipePlan, RunRecord, build_datasets, input_loader, recipe_errors
from petl_modules.training import BASE_METRICS, PETLBrain, extra_train_loggers, unweighted_accuracy

DATASET = "IEMOCAP"
FOLDS = tuple(range(1, IEMOCAP_NUM_FOLDS + 1))
METRICS = {**BASE_METRICS, "unweighted_accuracy": unweighted_accuracy}

if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    sb.utils.distributed.ddp_init_group(run_opts)  # torchrun: one process per device

    with recipe_errors(DATASET):  # a wrong option, file or data folder: one line, exit status 1
        # The command checked and its folds planned (finished ones found) before anything is written; a
        # hyperparameter file that is not found as given is looked up in this recipe's folder.
        plan = RecipePlan(DATASET, hparams_file, overrides, run_opts, FOLDS, METRICS, Path(__file__).parent)
        if plan.debug:  # a throw-away run in <output_folder>/debug/: emptied first, never mixed with results
            run_on_main(shutil.rmtree, args=[plan.output_folder], kwargs={"ignore_errors": True})
        ddp_barrier()  # every rank has planned before rank 0 writes
        record = RunRecord(plan)
        for fold in plan.folds_to_run():
            # Data preparation on the main process only (the others wait); classes.txt fixes the label order.
            settings = plan.fold_settings(fold)
            manifests = run_on_main(
                prepare_iemocap,
                kwargs={
                    "data_folder": settings["data_folder"],
                    "save_folder": plan.manifest_folder,
                    "few_shot_samples": settings["few_shot_samples"],
                    "seed": settings["seed"],
                    "fold": fold,
                },
            )
            # The model, once the data is known to match num_classes; then the run is recorded. --test_only
            # reads a trained run and writes nothing.
            hparams = plan.load_hparams(fold, manifests)
            if not plan.test_only:
                sb.create_experiment_directory(experiment_directory=hparams["output_folder"])
                record.record_hyperparams(fold)
            loader = input_loader(hparams, plan.feature_cache_folder, read_only=plan.test_only)
            datasets = build_datasets(manifests, loader)

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
            record.finish_fold(fold, brain, manifests)
        record.write_results()
