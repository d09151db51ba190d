"""The model organism: a tiny real Llama-architecture LM that sublab pretrains itself, offline, in minutes."""
