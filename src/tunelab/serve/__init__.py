"""`tunelab serve`: an OpenAI-compatible server for a base model and many adapters on it.

``engine`` owns the model and its single generation thread, ``routing`` decides which adapter
answers (aliases, A/B shares, rollback, rollout), ``app`` is the FastAPI app, ``server`` builds and
runs it (and runs it in a thread for tests), ``cli`` is the command. Nothing is imported here, so
``tunelab --help`` stays fast.
"""
