"""Deployment: the export manifest, ``export.py``'s graph writer, and the torch-free runtime.

``deploy.runtime`` and ``deploy.manifest`` import only the standard library, numpy, Pillow and the
chosen runtime; ``deploy.export`` needs torch.
"""
