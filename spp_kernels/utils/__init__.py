"""Bottom tier: atomic file writes (`io`), Hugging Face model helpers (`hf`), seeds (`seeding`).

Nothing here imports another spp_kernels subpackage.
"""
