"""Few-shot evaluation: COCO-style captioning (CIDEr) and VQAv2-style accuracy, with the reference's
protocol (prompts, demo sampling, beam search, post-processing), as Composer evaluators and standalone tools.

Modules: `prompts` (prompt strings), `postprocess` (cutting generations), `cider` / `vqa_accuracy` (metrics),
`datasets` (COCO Karpathy / COCO captions / VQAv2 readers), `easy_vqa` (the easy-vqa package in VQAv2 layout),
`protocol` (eval samples, query set and demos per trial seed), `generation` (batched prompts -> model.generate ->
text), `tasks` (a configured task: batches per rank, scoring), `config` (the `evaluators:` YAML section),
`composer_eval` (Evaluators, metrics and the ComposerModel dispatch), `checkpoints` (loading checkpoints for tools).
The reference's whole suite: `benchmarks` (the eight benchmarks, defined once), `native_vqa`, `ok_vqa`,
`class_datasets`, `imagenet_classnames`, `classification` (class-name log-likelihoods with a reused KV cache),
`class_metrics`, `classification_task`, `rices` (retrieved demonstrations), `suite` (resumable runs, the table).
"""
