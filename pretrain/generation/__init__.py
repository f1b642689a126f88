"""Decoding a trained model: `python -m pretrain.generate` (pretrain/generate.py) on these parts.

kv_cache.py   the KV cache, through each attention module's `attention_op` and the model's `position_buffers`
sampling.py   greedy, temperature and top-k decoding, prefill then one token per forward
load.py       a run directory or step folder -> its config, checked checkpoint, model and tokenizer
"""
