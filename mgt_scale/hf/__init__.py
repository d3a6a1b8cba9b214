# Hugging Face interoperability: `mgt export --format hf` (export_hf.py: a directory that transformers
# loads with trust_remote_code, its model code copied from mgt_scale/model; tokenizer_json.py: a
# tokenizers model built from our SentencePiece model) and `mgt eval` (mgt_scale/commands/eval.py:
# perplexity through lm-evaluation-harness, lm_eval_task.py with the task in tasks/, checked against our
# own windowed loss in text_loss.py).
# Needs the `hf` extra (transformers); `mgt eval` the `eval` extra (lm-eval).
