//! LongBench data: the task table, readers, prompt building and truncation.
pub mod prompt;
pub mod tasks;
