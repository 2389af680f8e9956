"""Built-in dkr plugins: storage backends and whiteout resolvers."""
