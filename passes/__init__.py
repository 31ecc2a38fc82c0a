"""torch.fx passes: capture a model's graph, find its linear computations, rewrite them."""
