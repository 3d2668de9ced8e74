"""Pure computations shared by use-cases and storage (downsampling): no I/O, no server imports
beyond the error tree."""
