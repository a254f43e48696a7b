//! Logic shards (filled in by the gate issue).
