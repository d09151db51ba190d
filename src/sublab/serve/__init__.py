"""`sublab serve MODEL`: an OpenAI-compatible HTTP server over local models (the organism, HF folders).

    sublab serve organism/default --port 8000            # then api.base_url: http://127.0.0.1:8000/v1
    sublab serve organism/tiny --faults 0.2               # 20% of requests fail (429 / 500 / dropped)

app.py      the FastAPI app: /v1/models, /v1/chat/completions, /v1/files, /v1/fine_tuning/jobs, /v1/batches
engine.py   one thread owns the models; concurrent chat requests are micro-batched into one generate call
models.py   served model ids -> ModelRef -> loaded backends (fine-tuned models join when their job ends)
jobs.py     fine-tuning jobs run by the local backend in a background thread, persisted in --state-dir
batches.py  the Batch API: a JSONL of chat requests in, a JSONL of responses out
store.py    uploaded files and small JSON state, written atomically
faults.py   fault injection for reliability tests
"""
