"""llama.cpp's GGUF files: the layout both directions share (:mod:`jaxft.gguf.layout`)."""
