//! Third-party code kept apart from ftk's own: each module states where it comes from,
//! its licence, and the list of changes made to it (each also marked `ftk:` in place).

pub mod sd;
