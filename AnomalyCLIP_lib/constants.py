"""The method's fixed numbers (torch-free, so the command-line layer can import them)."""

DPAM_LAYER = 20  # the last DPAM_LAYER - 1 vision blocks run in DPAM mode (method §3)
DPAM_DEPTH = 24  # vision layers of the backbones the method is defined for (ViT-L/14)
