"""The MoE variant: the sparse MoE layer and the upcycling transform."""
