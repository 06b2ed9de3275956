"""Run by tests/test_eval_integration.py on N ranks (torchrun: `train_helpers.rank_launcher`): the Composer
few-shot path (FewShotLoader batches -> FewShotComposerModel.eval_forward -> FewShotScore gather/broadcast) on a
deterministic tiny model; each rank writes what its metric computed, so the test can compare ranks and world sizes."""

from __future__ import annotations

import json
import sys

import torch
from composer.utils import dist, get_device

from flamingo_composer.eval.composer_eval import FewShotComposerModel, FewShotLoader, fewshot_metrics
from flamingo_composer.eval.config import EvalSplitConfig, EvaluatorConfig
from flamingo_composer.eval.tasks import FewShotTask
from flamingo_composer.models.factory import TokenizerConfig, build_flamingo
from flamingo_composer.models.tiny import tiny_model_config


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.initialize_dist(get_device("cpu"))
    bundle = build_flamingo(
        tiny_model_config(vision="tiny-vit-64", tokenizer=TokenizerConfig(builtin="easy_vqa"))
    )
    with torch.no_grad():  # open the gates so the images change the text
        for name, param in bundle.model.named_parameters():
            if name.endswith("_gate"):
                param.fill_(0.5)
    model = FewShotComposerModel(bundle.model, bundle.tokenizer)
    split = EvalSplitConfig(format="easy_vqa")
    cfg = EvaluatorConfig(name="ev", kind="vqa", train=split, test=split, shots=[2], num_trials=2,
                          trial_seeds=[1, 2], num_samples=20, batch_size=4, greedy=True)  # fmt: skip
    metrics = {k: v for k, v in fewshot_metrics().items() if k.startswith("VQAAccuracy")}
    loader = FewShotLoader(FewShotTask(cfg, bundle.tokenizer, bundle.image_transform), shot=2)
    records = 0
    for batch in loader:
        outputs = model.eval_forward(batch)
        for metric in metrics.values():
            model.update_metric(batch, outputs, metric)
        records += len(outputs)
    values = {name: float(metric.compute()) for name, metric in metrics.items()}
    result = metrics["VQAAccuracy"].last_result
    with open(f"{out}/rank{dist.get_global_rank()}.json", "w") as f:
        predictions = [[trial, qid, pred] for trial, qid, pred, _ in metrics["VQAAccuracy"].records]
        json.dump({"values": values, "trials": result["trials"], "records_this_rank": records,
                   "predictions": predictions}, f)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
