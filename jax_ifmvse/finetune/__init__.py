"""`ifmvse finetune`: a backbone fine-tuned end to end (the challenge baseline's recipe) on `trainer`.

`model` (backbone + pooling + head), `data` (rows, bucketed audio batches), `export` (RUN/hf/,
head weights, prediction CSVs), `run` (objective, optimizer, step, `finetune_run` on
`trainer.fit`, the command) and `predictor` (`FinetunedPredictor`, which imports no training code).
"""
