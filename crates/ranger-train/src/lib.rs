//! ranger-train
