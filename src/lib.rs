//! Workspace test host.
