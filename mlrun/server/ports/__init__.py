"""The ports: the interfaces (typing Protocols) and the records that cross them, between the
use-cases and what implements them (storage engines, pipelines). Import nothing but wire types,
the error tree and the standard library."""
