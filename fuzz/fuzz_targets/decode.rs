//! Any bytes from the network, decoded as every message a broker, slave or monitor
//! receives: an error is fine, a panic is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lmbus_schemas::*;

fuzz_target!(|data: &[u8]| {
    let _ = decode::<Hello>(data);
    let _ = decode::<RegisterRequest>(data);
    let _ = decode::<UnregisterRequest>(data);
    let _ = decode::<Heartbeat>(data);
    let _ = decode::<SlaveReport>(data);
    let _ = decode::<Reply>(data);
    let _ = decode::<ControlMessage>(data);
    let _ = decode::<ReleaseRequest>(data);
    let _ = decode::<ReleaseReply>(data);
    let _ = decode::<StatusReply>(data);
    let _ = decode::<ReplicaBeat>(data);
    let _ = decode::<Alert>(data);
    let _ = decode::<LedgerEntry>(data);
    let _ = decode::<SnapshotChunk>(data);
    let _ = decode::<SnapshotManifest>(data);
});
