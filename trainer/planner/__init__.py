"""Planning without allocating: the memory and placement plan, and the time plan of a recipe on a cluster."""
