//! The transport conformance suite on the in-memory transport.

use keelson_protocol::transport::memory::MemoryTransport;
use std::sync::Arc;

keelson_protocol::transport_conformance_tests!(Arc::new(MemoryTransport::new()));
