//! LongBench data: the task table, readers, task selection, prompt building and truncation.
pub mod longbench;
pub mod prompt;
pub mod ruler;
pub mod select;
pub mod tasks;
