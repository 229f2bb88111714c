"""Release: the champion exported for deployment (merged safetensors, GGUF, an Ollama Modelfile), each artifact
loaded back and scored on the evaluation's test rows, and measured under a short loopback load test."""
