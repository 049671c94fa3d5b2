//! Manifest-directory source (standalone mode).
