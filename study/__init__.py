"""The study runner: one config drives every stage (synth -> pretrain -> finetune -> evaluate). See docs/evaluate.md."""
