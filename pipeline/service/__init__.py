"""The inspection service: ``serve.py`` (FastAPI on uvicorn) over the one engine.

* :mod:`pipeline.service.config`: the command line, parsed once into a frozen :class:`ServeConfig`.
* :mod:`pipeline.service.model`: the loaded scorer, the thresholds in force and how one upload is judged.
* :mod:`pipeline.service.batcher`: concurrent requests grouped into batches for one worker thread.
* :mod:`pipeline.service.metrics`: counters and histograms in Prometheus' text format.
* :mod:`pipeline.service.app`: the HTTP API and the web page.
* :mod:`pipeline.service.server`: uvicorn with graceful SIGTERM handling; ``main``.
* :mod:`pipeline.service.client`: a small stdlib client (tests, benchmark, scripts).

Torch-free at import: with ``--runtime onnxruntime|openvino`` no torch is imported.
"""
