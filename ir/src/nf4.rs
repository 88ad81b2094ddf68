//! TEMPORARY STUB (being replaced by the NF4 implementation).
#[derive(Clone, Debug, PartialEq)]
pub enum Nf4Scales { Plain { absmax: Vec<f32> }, Double { codes: Vec<u8>, absmax2: Vec<f32>, offset: f32, block2: usize } }
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor { pub shape: Vec<usize>, pub block: usize, pub packed: Vec<u8>, pub scales: Nf4Scales }
pub fn quantize(_w: &[f32], _shape: &[usize], _block: usize, _dq: Option<usize>) -> Nf4Tensor { todo!() }
pub fn dequantize(_q: &Nf4Tensor) -> Vec<f32> { todo!() }
