"""cluster.yaml: the schema, the hardened reader, and the paths ugrod uses."""
