//! `factorize`: low-rank factorization of linear weights (`W ~ A B`, run as two linears).

pub mod lowrank;
