"""Examples of keepstream inside a Python application; ``tests/test_examples.py`` runs them.

- ``fastapi_app``: a FastAPI app with keepstream mounted at ``/ks``, its own auth and its own
  generator (``uvicorn examples.fastapi_app:app``).
- ``langchain_provider``: any LangChain chat model or chain as a provider
  (``python -m examples.langchain_provider``).
- ``follow_without_http``: start a generation and follow it in-process
  (``python -m examples.follow_without_http``).
"""
