//! The suite run on the reference backend itself: proves its finite-difference checks hold
//! for the oracle (a failure here is a bug in the suite or the reference, not a backend).
lisa_conformance::conformance_tests!(lisa_core::reference::RefBackend);
