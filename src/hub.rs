//! Model resolution (filled in by the model issue).
