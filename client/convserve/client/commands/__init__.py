"""The commands of ``convserve``, one module each; `convserve.client.cli` lists them."""
