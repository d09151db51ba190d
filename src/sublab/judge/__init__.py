"""The LLM judge: any model spec scores answers 0-100 by the emergent-misalignment convention (docs/judge.md).

prompts.py   judge prompts (YAML `name: template`; packaged: data/em_prompts.yaml), filling, truncation
samples.py   the input forms: question/answer, prompt/completion, chat messages
scoring.py   the 0-100 rules: top-k log-probs of the first token, or sampled leading integers
calls.py     one batch of judge calls to a backend, each item's failure kept to that item
cache.py     the append-only judgement cache (resume without asking again)
summary.py   summary.json: counts, unscorable reasons, misaligned rate with a Wilson interval
stage.py     the stage: judge_file(samples, out_dir, judge, JudgeConfig) -> judgements.jsonl, summary.json
"""
