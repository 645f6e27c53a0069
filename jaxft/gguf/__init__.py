"""llama.cpp's GGUF files: the layout both directions share (:mod:`jaxft.gguf.layout`), reading a GGUF into the HF
loading path (:mod:`jaxft.gguf.read`), its tokenizer (:mod:`jaxft.gguf.tokenizer`) and conversion to a HF folder
(:mod:`jaxft.gguf.convert`)."""
