"""nn.Modules and autograd functions of the method: subspace linears, compressed activations."""
