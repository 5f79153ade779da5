"""Code shipped inside exports: loads with torch and diffusers alone (never imports this project)."""
