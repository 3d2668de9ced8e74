"""The composition root: configuration, logging, readiness and the supervisor that builds the
use-cases, picks the write path and storage engines, and runs listeners and writers. The only
package that may import every other part of the server."""
