"""Export and import: a checkpoint as a diffusers-format directory (with its standalone code), released students in."""
