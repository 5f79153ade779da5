"""The project's own small teachers (2-D toy, digits): trained here by flow matching and cached as safetensors."""
