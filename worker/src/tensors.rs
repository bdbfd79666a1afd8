//! Arrow columns to ONNX tensors and tensors back to Arrow arrays, following the mapping the
//! coordinator validated (`nightshift_signature::column_mapping`). Rows that cannot become a
//! tensor (a null, a list of the wrong length) are found here, row by row, before the model runs.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, FixedSizeListArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field};
use arrow::datatypes::{Float16Type, Float32Type, Float64Type, Int32Type, Int64Type};
use arrow_array::RecordBatch;
use nightshift_proto::Pool;
use nightshift_signature::{ElemType, InputBinding, OutputBinding, Shape};
use ort::session::SessionInputValue;
use ort::value::{DynValue, TensorRef};

/// A row that cannot feed the model, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowProblem {
    pub row: usize,
    pub message: String,
}

/// Rows of `batch` whose mapped input columns cannot become tensors. Returns them in row order,
/// one problem per row.
pub fn row_problems(batch: &RecordBatch, inputs: &[InputBinding]) -> Vec<RowProblem> {
    let mut bad: Vec<Option<String>> = vec![None; batch.num_rows()];
    for b in inputs {
        let Some(col) = batch.column_by_name(&b.column) else {
            continue;
        };
        let want = match b.shape {
            Shape::Flat => None,
            Shape::Wide { width } => width,
            Shape::Tokens(_) => {
                null_text_rows(col.as_ref(), &b.column, &mut bad);
                continue;
            }
        };
        let lengths = list_lengths(col.as_ref());
        // A ragged list column with no declared width takes its width from the first good row.
        let mut width = want;
        for (row, slot) in bad.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            if col.is_null(row) {
                *slot = Some(format!("column `{}` is null", b.column));
                continue;
            }
            let Some((len, inner_nulls)) = lengths.as_ref().map(|l| l(row)) else {
                continue;
            };
            if inner_nulls {
                *slot = Some(format!("column `{}` holds a null element", b.column));
                continue;
            }
            match width {
                Some(w) if len != w => {
                    *slot = Some(format!(
                        "column `{}` holds {len} values, model input `{}` wants {w}",
                        b.column, b.onnx_name
                    ))
                }
                None => width = Some(len),
                _ => {}
            }
        }
    }
    bad.into_iter()
        .enumerate()
        .filter_map(|(row, m)| m.map(|message| RowProblem { row, message }))
        .collect()
}

/// Rows whose text is null (their token lists are): poison rows, named by the text column.
fn null_text_rows(col: &dyn Array, carrier: &str, bad: &mut [Option<String>]) {
    let text = carrier.rsplit_once('.').map_or(carrier, |(c, _)| c);
    for (row, slot) in bad.iter_mut().enumerate() {
        if slot.is_none() && col.is_null(row) {
            *slot = Some(format!("[text] column `{text}` is null"));
        }
    }
}

type LengthFn<'a> = Box<dyn Fn(usize) -> (usize, bool) + 'a>;

/// For list columns, a function giving each row's length and whether it holds a null element.
fn list_lengths(col: &dyn Array) -> Option<LengthFn<'_>> {
    match col.data_type() {
        DataType::FixedSizeList(_, n) => {
            let l = col.as_fixed_size_list();
            let n = *n as usize;
            Some(Box::new(move |row| {
                let values = l.values();
                let start = (l.offset() + row) * n;
                let nulls =
                    values.null_count() > 0 && (start..start + n).any(|i| values.is_null(i));
                (n, nulls)
            }))
        }
        DataType::List(_) => {
            let l = col.as_list::<i32>();
            Some(Box::new(move |row| {
                let offsets = l.value_offsets();
                let (s, e) = (offsets[row] as usize, offsets[row + 1] as usize);
                let values = l.values();
                let nulls = values.null_count() > 0 && (s..e).any(|i| values.is_null(i));
                (e - s, nulls)
            }))
        }
        DataType::LargeList(_) => {
            let l = col.as_list::<i64>();
            Some(Box::new(move |row| {
                let offsets = l.value_offsets();
                let (s, e) = (offsets[row] as usize, offsets[row + 1] as usize);
                let values = l.values();
                let nulls = values.null_count() > 0 && (s..e).any(|i| values.is_null(i));
                (e - s, nulls)
            }))
        }
        _ => None,
    }
}

/// Why a batch's columns could not become the model's tensors, or its outputs Arrow arrays.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    #[error("column `{0}` missing from batch")]
    MissingColumn(String),
    #[error("model {direction} `{name}`: unsupported tensor type {elem}")]
    UnsupportedType {
        direction: &'static str,
        name: String,
        elem: String,
    },
    #[error("model input `{input}` from column `{column}`: {reason}")]
    Cast {
        input: String,
        column: String,
        reason: String,
    },
    #[error("model output `{name}` has shape {got:?}, expected {expected}")]
    Shape {
        name: String,
        got: Vec<i64>,
        expected: String,
    },
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
    #[error("building the output column: {0}")]
    Arrow(String),
}

/// One model input, ready to hand to ONNX Runtime without a copy: the column's values laid out
/// row after row, already in the tensor's element type.
pub struct TensorInput {
    pub name: String,
    pub values: ArrayRef,
    pub shape: Vec<i64>,
}

impl TensorInput {
    /// A tensor that borrows the Arrow buffer (no copy).
    pub fn view(&self) -> Result<SessionInputValue<'_>, TensorError> {
        let err = |e: ort::Error| TensorError::Runtime(e.to_string());
        let shape = self.shape.clone();
        Ok(match self.values.data_type() {
            DataType::Float16 => TensorRef::from_array_view((
                shape,
                &self.values.as_primitive::<Float16Type>().values()[..],
            ))
            .map_err(err)?
            .into(),
            DataType::Float32 => TensorRef::from_array_view((
                shape,
                &self.values.as_primitive::<Float32Type>().values()[..],
            ))
            .map_err(err)?
            .into(),
            DataType::Float64 => TensorRef::from_array_view((
                shape,
                &self.values.as_primitive::<Float64Type>().values()[..],
            ))
            .map_err(err)?
            .into(),
            DataType::Int32 => TensorRef::from_array_view((
                shape,
                &self.values.as_primitive::<Int32Type>().values()[..],
            ))
            .map_err(err)?
            .into(),
            DataType::Int64 => TensorRef::from_array_view((
                shape,
                &self.values.as_primitive::<Int64Type>().values()[..],
            ))
            .map_err(err)?
            .into(),
            other => {
                return Err(TensorError::UnsupportedType {
                    direction: "input",
                    name: self.name.clone(),
                    elem: other.to_string(),
                });
            }
        })
    }
}

/// Builds the model's inputs from a batch whose rows all passed `row_problems`.
pub fn input_tensors(
    batch: &RecordBatch,
    inputs: &[InputBinding],
) -> Result<Vec<TensorInput>, TensorError> {
    let rows = batch.num_rows();
    inputs
        .iter()
        .map(|b| {
            let col = batch
                .column_by_name(&b.column)
                .ok_or_else(|| TensorError::MissingColumn(b.column.clone()))?;
            let (values, width) = match b.shape {
                Shape::Tokens(_) => padded_values(col),
                _ => flat_values(col),
            };
            let shape: Vec<i64> = match b.shape {
                Shape::Flat => vec![rows as i64],
                Shape::Wide { .. } | Shape::Tokens(_) => vec![rows as i64, width as i64],
            };
            let target = match b.elem {
                ElemType::F16 => DataType::Float16,
                ElemType::F32 => DataType::Float32,
                ElemType::F64 => DataType::Float64,
                ElemType::I32 => DataType::Int32,
                ElemType::I64 => DataType::Int64,
                other => {
                    return Err(TensorError::UnsupportedType {
                        direction: "input",
                        name: b.onnx_name.clone(),
                        elem: other.to_string(),
                    });
                }
            };
            // Same type: no copy; a lossless widening: one conversion.
            let values = cast(&values, &target).map_err(|e| TensorError::Cast {
                input: b.onnx_name.clone(),
                column: b.column.clone(),
                reason: e.to_string(),
            })?;
            Ok(TensorInput {
                name: b.onnx_name.clone(),
                values,
                shape,
            })
        })
        .collect()
}

/// Token lists (`List<Int64>`) padded with zeros to the longest row, laid out row after row,
/// and that length.
fn padded_values(col: &ArrayRef) -> (ArrayRef, usize) {
    let lists = col.as_list::<i32>();
    let longest = (0..lists.len())
        .map(|r| lists.value_length(r) as usize)
        .max()
        .unwrap_or(0);
    let mut out = vec![0i64; lists.len() * longest];
    for (r, row) in out.chunks_mut(longest.max(1)).enumerate().take(lists.len()) {
        if lists.is_null(r) {
            continue;
        }
        let values = lists.value(r);
        let values = values.as_primitive::<Int64Type>().values();
        row[..values.len()].copy_from_slice(values);
    }
    (Arc::new(arrow::array::Int64Array::from(out)), longest)
}

/// The values of a column laid out row after row, and the number of values per row.
fn flat_values(col: &ArrayRef) -> (ArrayRef, usize) {
    let rows = col.len();
    match col.data_type() {
        DataType::FixedSizeList(_, n) => {
            let l = col.as_fixed_size_list();
            let n = *n as usize;
            (l.values().slice(l.offset() * n, rows * n), n)
        }
        DataType::List(_) => {
            let l = col.as_list::<i32>();
            let o = l.value_offsets();
            let (s, e) = (o[0] as usize, o[rows] as usize);
            (
                l.values().slice(s, e - s),
                (e - s).checked_div(rows).unwrap_or(0),
            )
        }
        DataType::LargeList(_) => {
            let l = col.as_list::<i64>();
            let o = l.value_offsets();
            let (s, e) = (o[0] as usize, o[rows] as usize);
            (
                l.values().slice(s, e - s),
                (e - s).checked_div(rows).unwrap_or(0),
            )
        }
        _ => (col.clone(), 1),
    }
}

/// One model output as the Arrow array of its column: `[rows]` plain, `[rows, K]` (or
/// `[rows, seq, K]` pooled over each row's `lengths` real tokens) a FixedSizeList of K,
/// L2-normalised and stored as the binding says.
pub fn output_array(
    value: &DynValue,
    o: &OutputBinding,
    rows: usize,
    lengths: Option<&[usize]>,
) -> Result<ArrayRef, TensorError> {
    let mut values = match o.pool {
        Some(pool) => pooled(value, o, rows, pool, lengths)?,
        None => plain(value, o, rows)?,
    };
    if o.normalize
        && let Some(k) = o.width
    {
        values = normalized(&values, k)?;
    }
    let stored = arrow_type(o.stored, &o.onnx_name)?;
    if values.data_type() != &stored {
        values = cast(&values, &stored).map_err(|e| TensorError::Arrow(e.to_string()))?;
    }
    Ok(match o.width {
        None => values,
        Some(k) => {
            let field = Arc::new(Field::new("item", values.data_type().clone(), false));
            Arc::new(
                FixedSizeListArray::try_new(field, k as i32, values, None)
                    .map_err(|e| TensorError::Arrow(e.to_string()))?,
            )
        }
    })
}

/// The Arrow type of a tensor element type.
fn arrow_type(elem: ElemType, name: &str) -> Result<DataType, TensorError> {
    nightshift_signature::elem_to_arrow(elem).ok_or_else(|| TensorError::UnsupportedType {
        direction: "output",
        name: name.to_string(),
        elem: elem.to_string(),
    })
}

/// A `[rows]` or `[rows, K]` output's values, row after row.
fn plain(value: &DynValue, o: &OutputBinding, rows: usize) -> Result<ArrayRef, TensorError> {
    let check = |dims: &[i64]| -> Result<(), TensorError> {
        let ok = match o.width {
            None => dims == [rows as i64] || dims == [rows as i64, 1],
            Some(k) => dims == [rows as i64, k as i64],
        };
        ok.then_some(()).ok_or_else(|| TensorError::Shape {
            name: o.onnx_name.clone(),
            got: dims.to_vec(),
            expected: format!(
                "[{rows}{}]",
                o.width.map(|k| format!(", {k}")).unwrap_or_default()
            ),
        })
    };
    match o.elem {
        ElemType::F16 => extract::<Float16Type>(value, check),
        ElemType::F32 => extract::<Float32Type>(value, check),
        ElemType::F64 => extract::<Float64Type>(value, check),
        ElemType::I32 => extract::<Int32Type>(value, check),
        ElemType::I64 => extract::<Int64Type>(value, check),
        other => Err(TensorError::UnsupportedType {
            direction: "output",
            name: o.onnx_name.clone(),
            elem: other.to_string(),
        }),
    }
}

/// A `[rows, seq, K]` output pooled to `[rows, K]` (float32) over each row's real tokens.
fn pooled(
    value: &DynValue,
    o: &OutputBinding,
    rows: usize,
    pool: Pool,
    lengths: Option<&[usize]>,
) -> Result<ArrayRef, TensorError> {
    let k = o.width.unwrap_or(0);
    let runtime = |e: ort::Error| TensorError::Runtime(e.to_string());
    let (shape, data): (Vec<i64>, Vec<f32>) = match o.elem {
        ElemType::F32 => {
            let (shape, data) = value.try_extract_tensor::<f32>().map_err(runtime)?;
            (shape.to_vec(), data.to_vec())
        }
        ElemType::F16 => {
            let (shape, data) = value.try_extract_tensor::<half::f16>().map_err(runtime)?;
            (shape.to_vec(), data.iter().map(|v| v.to_f32()).collect())
        }
        other => {
            return Err(TensorError::UnsupportedType {
                direction: "output",
                name: o.onnx_name.clone(),
                elem: other.to_string(),
            });
        }
    };
    let seq = match shape.as_slice() {
        [r, s, w] if *r == rows as i64 && *w == k as i64 && *s > 0 => *s as usize,
        _ => {
            return Err(TensorError::Shape {
                name: o.onnx_name.clone(),
                got: shape,
                expected: format!("[{rows}, seq, {k}]"),
            });
        }
    };
    let mut out = vec![0f32; rows * k];
    for (r, row_out) in out.chunks_mut(k.max(1)).enumerate().take(rows) {
        let real = lengths
            .and_then(|l| l.get(r).copied())
            .unwrap_or(seq)
            .clamp(1, seq);
        let row = &data[r * seq * k..(r + 1) * seq * k];
        pool_row(pool, &row[..real * k], k, row_out);
    }
    Ok(Arc::new(arrow::array::Float32Array::from(out)))
}

/// Pools `tokens` (real tokens x `k`, row after row) into `out`.
fn pool_row(pool: Pool, tokens: &[f32], k: usize, out: &mut [f32]) {
    let mut vectors = tokens.chunks(k);
    match pool {
        Pool::Cls => out.copy_from_slice(vectors.next().unwrap_or(&[])),
        Pool::Mean => {
            let n = (tokens.len() / k.max(1)).max(1) as f32;
            for v in vectors {
                out.iter_mut().zip(v).for_each(|(o, x)| *o += x);
            }
            out.iter_mut().for_each(|o| *o /= n);
        }
        Pool::Max => {
            out.fill(f32::NEG_INFINITY);
            for v in vectors {
                out.iter_mut().zip(v).for_each(|(o, x)| *o = o.max(*x));
            }
        }
    }
}

/// Each row of `k` values scaled to unit L2 norm (a zero row stays zero), as float32.
fn normalized(values: &ArrayRef, k: usize) -> Result<ArrayRef, TensorError> {
    let values = cast(values, &DataType::Float32).map_err(|e| TensorError::Arrow(e.to_string()))?;
    let mut out = values.as_primitive::<Float32Type>().values().to_vec();
    for row in out.chunks_mut(k.max(1)) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|x| *x /= norm);
        }
    }
    Ok(Arc::new(arrow::array::Float32Array::from(out)))
}

/// A tensor's values, after `check` accepted its shape, as an Arrow array (one copy).
fn extract<T>(
    value: &DynValue,
    check: impl Fn(&[i64]) -> Result<(), TensorError>,
) -> Result<ArrayRef, TensorError>
where
    T: arrow::datatypes::ArrowPrimitiveType,
    T::Native: ort::value::PrimitiveTensorElementType,
{
    let (shape, data) = value
        .try_extract_tensor::<T::Native>()
        .map_err(|e| TensorError::Runtime(e.to_string()))?;
    check(shape)?;
    Ok(Arc::new(arrow::array::PrimitiveArray::<T>::new(
        data.to_vec().into(),
        None,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, ListArray};
    use arrow::datatypes::{Float32Type, Schema};

    fn fixed(rows: Vec<Option<Vec<Option<f32>>>>, n: i32) -> ArrayRef {
        Arc::new(FixedSizeListArray::from_iter_primitive::<Float32Type, _, _>(rows, n))
    }

    #[test]
    fn finds_nulls_and_wrong_lengths() {
        let list = ListArray::from_iter_primitive::<Float32Type, _, _>(vec![
            Some(vec![Some(1.0), Some(2.0)]),
            Some(vec![Some(1.0)]),
            None,
            Some(vec![Some(1.0), None]),
            Some(vec![Some(3.0), Some(4.0)]),
        ]);
        let ids = Int64Array::from(vec![1, 2, 3, 4, 5]);
        let schema = Schema::new(vec![
            Field::new("f", list.data_type().clone(), true),
            Field::new("id", DataType::Int64, false),
        ]);
        let batch =
            RecordBatch::try_new(Arc::new(schema), vec![Arc::new(list), Arc::new(ids)]).unwrap();
        let b = InputBinding {
            onnx_name: "x".into(),
            column: "f".into(),
            elem: ElemType::F32,
            shape: Shape::Wide { width: Some(2) },
        };
        let problems = row_problems(&batch, std::slice::from_ref(&b));
        let rows: Vec<usize> = problems.iter().map(|p| p.row).collect();
        assert_eq!(rows, [1, 2, 3]);
        assert!(
            problems[0].message.contains("holds 1 values"),
            "{:?}",
            problems[0]
        );
        assert!(problems[1].message.contains("is null"));
        assert!(problems[2].message.contains("null element"));

        let good = arrow::compute::filter_record_batch(
            &batch,
            &arrow::array::BooleanArray::from(vec![true, false, false, false, true]),
        )
        .unwrap();
        assert!(row_problems(&good, std::slice::from_ref(&b)).is_empty());
        let (values, width) = flat_values(good.column(0));
        assert_eq!(width, 2);
        assert_eq!(
            values.as_primitive::<Float32Type>().values().to_vec(),
            vec![1.0, 2.0, 3.0, 4.0]
        );
    }

    #[test]
    fn sliced_fixed_lists_keep_their_offset() {
        let col = fixed(
            vec![
                Some(vec![Some(1.0), Some(2.0)]),
                Some(vec![Some(3.0), Some(4.0)]),
                Some(vec![Some(5.0), Some(6.0)]),
            ],
            2,
        );
        let sliced = col.slice(1, 2);
        let (values, width) = flat_values(&sliced);
        assert_eq!(width, 2);
        assert_eq!(
            values.as_primitive::<Float32Type>().values().to_vec(),
            vec![3.0, 4.0, 5.0, 6.0]
        );
    }

    #[test]
    fn pooling_reads_only_real_tokens() {
        // Two real tokens of width 2; padding is not passed in.
        let tokens = [1.0, -2.0, 3.0, 4.0];
        let mut out = [0.0; 2];
        pool_row(Pool::Mean, &tokens, 2, &mut out);
        assert_eq!(out, [2.0, 1.0]);
        let mut out = [0.0; 2];
        pool_row(Pool::Max, &tokens, 2, &mut out);
        assert_eq!(out, [3.0, 4.0]);
        let mut out = [0.0; 2];
        pool_row(Pool::Cls, &tokens, 2, &mut out);
        assert_eq!(out, [1.0, -2.0]);
        let v: ArrayRef = Arc::new(arrow::array::Float32Array::from(vec![3.0, 4.0, 0.0, 0.0]));
        let n = normalized(&v, 2).unwrap();
        assert_eq!(
            n.as_primitive::<Float32Type>().values(),
            &[0.6, 0.8, 0.0, 0.0]
        );
    }

    #[test]
    fn tensor_errors_are_typed() {
        let ids = Int64Array::from(vec![1, 2]);
        let schema = Schema::new(vec![Field::new("id", DataType::Int64, false)]);
        let batch = RecordBatch::try_new(Arc::new(schema), vec![Arc::new(ids)]).unwrap();
        let binding = |column: &str, elem| InputBinding {
            onnx_name: "x".into(),
            column: column.into(),
            elem,
            shape: Shape::Flat,
        };
        let missing = input_tensors(&batch, &[binding("gone", ElemType::I64)]);
        assert!(
            matches!(&missing, Err(TensorError::MissingColumn(c)) if c == "gone"),
            "{:?}",
            missing.err()
        );
        let unsupported = input_tensors(&batch, &[binding("id", ElemType::Bool)]);
        assert!(
            matches!(
                &unsupported,
                Err(TensorError::UnsupportedType {
                    direction: "input",
                    ..
                })
            ),
            "{:?}",
            unsupported.err()
        );
        let ok = input_tensors(&batch, &[binding("id", ElemType::I64)]).unwrap();
        assert_eq!(ok[0].shape, vec![2]);
    }
}
