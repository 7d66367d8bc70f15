//! Integer round-to-nearest quantization (interim scalar version; replaced by the optimised kernels).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Tensor,
    Channel,
    Group(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleSearch {
    None,
    Mse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntParams {
    pub bits: u8,
    pub granularity: Granularity,
    pub symmetric: bool,
    pub search: ScaleSearch,
}

#[derive(Debug, Clone, Default)]
pub struct IntQuantized {
    pub rows: usize,
    pub cols: usize,
    pub bits: u8,
    pub symmetric: bool,
    pub codes: Vec<i8>,
    pub scales: Vec<f32>,
    pub zero_points: Option<Vec<i8>>,
    pub scale_shape: [usize; 2],
}

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("non-finite value at flat index {0}")]
    NonFinite(usize),
    #[error("row length {cols} is not a multiple of group_size {group_size}")]
    GroupSize { cols: usize, group_size: usize },
}

pub fn quantize_into(
    data: &[f32],
    rows: usize,
    cols: usize,
    p: &IntParams,
    q: &mut IntQuantized,
    dequant: &mut [f32],
) -> Result<(), QuantError> {
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::NonFinite(i));
    }
    let group = match p.granularity {
        Granularity::Tensor => rows * cols,
        Granularity::Channel => cols,
        Granularity::Group(g) => {
            if !cols.is_multiple_of(g) {
                return Err(QuantError::GroupSize { cols, group_size: g });
            }
            g
        }
    };
    let qmax = ((1i32 << (p.bits - 1)) - 1) as f32;
    let qmin = -(1i32 << (p.bits - 1)) as f32;
    q.codes.resize(data.len(), 0);
    q.scales.clear();
    q.rows = rows;
    q.cols = cols;
    q.bits = p.bits;
    q.symmetric = true;
    q.zero_points = None;
    for (i, block) in data.chunks(group.max(1)).enumerate() {
        let absmax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = if absmax > 0.0 { absmax / ((qmax - qmin) / 2.0) } else { 1.0 };
        q.scales.push(scale);
        let base = i * group;
        for (j, &v) in block.iter().enumerate() {
            let c = (v / scale).round().clamp(qmin, qmax);
            q.codes[base + j] = c as i8;
            dequant[base + j] = c * scale;
        }
    }
    q.scale_shape = match p.granularity {
        Granularity::Tensor => [1, 1],
        Granularity::Channel => [rows, 1],
        Granularity::Group(g) => [rows, cols / g],
    };
    Ok(())
}
