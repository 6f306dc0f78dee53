"""Bottom tier: atomic file writes (`io`), Hugging Face model helpers (`hf`), seeds (`seeding`),
torch's thread count for a block (`threads`).

Nothing here imports another spp_kernels subpackage.
"""
