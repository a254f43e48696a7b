//! Client (filled in by the gate issue).
