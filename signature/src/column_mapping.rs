//! How table columns feed model inputs and how model outputs become columns.
//!
//! A FixedSizeList (or a List whose rows all have the model's length) of a numeric type becomes
//! `[batch, D]`; a plain numeric column becomes `[batch]` or `[batch, 1]` as the model declares.
//! Outputs `[batch]` and `[batch, K]` become a plain column and a FixedSizeList<_, K>. Element
//! types must match exactly or widen without loss.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};
use nightshift_proto::JobSpec;

use crate::onnx_model::{Dim, ElemType, ModelSignature, TensorSig};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MappingError(pub String);

/// The rank the model wants for an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `[batch]`
    Flat,
    /// `[batch, width]`; width None means "whatever the column's rows hold" (checked per batch).
    Wide { width: Option<usize> },
}

/// One model input and the column that feeds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputBinding {
    pub onnx_name: String,
    pub column: String,
    pub elem: ElemType,
    pub shape: Shape,
}

/// One model output and the column it becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputBinding {
    pub onnx_name: String,
    pub column: String,
    pub elem: ElemType,
    /// None for `[batch]`, Some(K) for `[batch, K]`.
    pub width: Option<usize>,
}

/// Everything the worker needs to turn record batches into tensors and back.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    pub inputs: Vec<InputBinding>,
    pub outputs: Vec<OutputBinding>,
    /// Passthrough columns (nullable) then output columns.
    pub output_schema: SchemaRef,
}

/// Checks the spec's mapping against the model and one input file's schema. Every refusal
/// names the column, the model input or output, and both types.
pub fn plan_tensors(
    spec: &JobSpec,
    model: &ModelSignature,
    input: &Schema,
    input_name: &str,
) -> Result<TensorPlan, MappingError> {
    let err = |m: String| Err(MappingError(m));
    let known = |v: &[TensorSig]| {
        v.iter()
            .map(|t| format!("`{}`", t.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut inputs = Vec::new();
    for (onnx_name, column) in &spec.model.inputs {
        let Some(sig) = model.input(onnx_name) else {
            return err(format!(
                "[model.inputs] maps `{onnx_name}`, but the model has no input of that name; its inputs are {}",
                known(&model.inputs)
            ));
        };
        let Ok(field) = input.field_with_name(column) else {
            return err(format!(
                "input column `{column}` (for model input `{onnx_name}`) is not in `{input_name}`; its columns are {}",
                column_list(input)
            ));
        };
        inputs.push(bind_input(sig, field)?);
    }
    for t in &model.inputs {
        if !spec.model.inputs.contains_key(&t.name) {
            return err(format!(
                "model input `{}` ({} {}) is not mapped to a column in [model.inputs]",
                t.name,
                t.elem,
                t.shape_text()
            ));
        }
    }
    let mut outputs = Vec::new();
    for (onnx_name, column) in &spec.model.outputs {
        let Some(sig) = model.output(onnx_name) else {
            return err(format!(
                "[model.outputs] maps `{onnx_name}`, but the model has no output of that name; its outputs are {}",
                known(&model.outputs)
            ));
        };
        outputs.push(bind_output(sig, column)?);
    }
    let mut fields: Vec<Field> = Vec::new();
    for col in &spec.output.passthrough {
        let Ok(field) = input.field_with_name(col) else {
            return err(format!(
                "passthrough column `{col}` is not in `{input_name}`; its columns are {}",
                column_list(input)
            ));
        };
        fields.push(Field::new(col, field.data_type().clone(), true));
    }
    for o in &outputs {
        fields.push(Field::new(&o.column, output_type(o), false));
    }
    Ok(TensorPlan {
        inputs,
        outputs,
        output_schema: Arc::new(Schema::new(fields)),
    })
}

fn column_list(schema: &Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| format!("`{}`", f.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The Arrow type of an output column.
pub fn output_type(o: &OutputBinding) -> DataType {
    let item = elem_to_arrow(o.elem).unwrap_or(DataType::Float32);
    match o.width {
        None => item,
        Some(k) => DataType::FixedSizeList(Arc::new(Field::new("item", item, false)), k as i32),
    }
}

/// The Arrow type holding a tensor element type, for the types tensors may have.
pub fn elem_to_arrow(e: ElemType) -> Option<DataType> {
    Some(match e {
        ElemType::F32 => DataType::Float32,
        ElemType::F64 => DataType::Float64,
        ElemType::I32 => DataType::Int32,
        ElemType::I64 => DataType::Int64,
        _ => return None,
    })
}

/// Whether every value of `from` is exactly representable as `to`.
pub fn widens(from: &DataType, to: ElemType) -> bool {
    use DataType::*;
    match to {
        ElemType::F32 => matches!(from, Float32 | Int8 | Int16 | UInt8 | UInt16),
        ElemType::F64 => matches!(
            from,
            Float32 | Float64 | Int8 | Int16 | Int32 | UInt8 | UInt16 | UInt32
        ),
        ElemType::I32 => matches!(from, Int8 | Int16 | Int32 | UInt8 | UInt16),
        ElemType::I64 => matches!(from, Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32),
        _ => false,
    }
}

fn bind_input(sig: &TensorSig, field: &Field) -> Result<InputBinding, MappingError> {
    let col = field.name();
    let want = format!("{} {}", sig.elem, sig.shape_text());
    let refuse = |why: String| {
        Err(MappingError(format!(
            "column `{col}` ({}) cannot feed model input `{}` ({want}): {why}",
            field.data_type(),
            sig.name
        )))
    };
    if elem_to_arrow(sig.elem).is_none() {
        return refuse(format!(
            "model input type {} is not supported (float32, float64, int32, int64 are)",
            sig.elem
        ));
    }
    let (item, list_len) = match field.data_type() {
        DataType::FixedSizeList(f, n) => (f.data_type().clone(), Some(Some(*n as usize))),
        DataType::List(f) | DataType::LargeList(f) => (f.data_type().clone(), Some(None)),
        other => (other.clone(), None),
    };
    if !widens(&item, sig.elem) {
        return refuse(format!(
            "element type {item} does not convert to {} without loss",
            sig.elem
        ));
    }
    let dims: Vec<Dim> = match &sig.dims {
        Some(d) => d.clone(),
        None if list_len.is_some() => vec![Dim::Dynamic, Dim::Dynamic],
        None => vec![Dim::Dynamic],
    };
    if let Some(Dim::Fixed(n)) = dims.first() {
        return refuse(format!(
            "the model fixes the batch dimension to {n}; export it with a dynamic batch axis"
        ));
    }
    let shape = match (dims.len(), list_len) {
        (1, None) => Shape::Flat,
        (1, Some(_)) => {
            return refuse("the model wants one value per row, the column holds lists".into());
        }
        (2, None) => match dims[1] {
            Dim::Fixed(1) | Dim::Dynamic => Shape::Wide { width: Some(1) },
            Dim::Fixed(d) => {
                return refuse(format!(
                    "the model wants {d} values per row, the column holds one"
                ));
            }
        },
        (2, Some(n)) => match (dims[1].clone(), n) {
            (Dim::Fixed(d), Some(n)) if d as usize != n => {
                return refuse(format!(
                    "the model wants {d} values per row, the column's lists hold {n}"
                ));
            }
            (Dim::Fixed(d), _) => Shape::Wide {
                width: Some(d as usize),
            },
            (Dim::Dynamic, n) => Shape::Wide { width: n },
        },
        (r, _) => return refuse(format!("rank {r} inputs are not supported (1 or 2 are)")),
    };
    Ok(InputBinding {
        onnx_name: sig.name.clone(),
        column: col.clone(),
        elem: sig.elem,
        shape,
    })
}

fn bind_output(sig: &TensorSig, column: &str) -> Result<OutputBinding, MappingError> {
    let refuse = |why: String| {
        Err(MappingError(format!(
            "model output `{}` ({} {}) cannot become column `{column}`: {why}",
            sig.name,
            sig.elem,
            sig.shape_text()
        )))
    };
    if elem_to_arrow(sig.elem).is_none() {
        return refuse(format!(
            "output type {} is not supported (float32, float64, int32, int64 are)",
            sig.elem
        ));
    }
    let width = match sig.dims.as_deref() {
        Some([_]) => None,
        Some([_, Dim::Fixed(k)]) => Some(*k as usize),
        Some([_, Dim::Dynamic]) => {
            return refuse(
                "its second dimension is not fixed, so the column width is unknown".into(),
            );
        }
        Some(d) => {
            return refuse(format!(
                "rank {} outputs are not supported (1 or 2 are)",
                d.len()
            ));
        }
        None => return refuse("the model declares no shape for it".into()),
    };
    Ok(OutputBinding {
        onnx_name: sig.name.clone(),
        column: column.to_string(),
        elem: sig.elem,
        width,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx_model::tests::model_bytes;

    fn spec(inputs: &[(&str, &str)], outputs: &[(&str, &str)], pass: &[&str]) -> JobSpec {
        let mut toml = String::from(
            "name = \"t\"\n[input]\nuri = \"i\"\n[model]\nuri = \"m\"\n[output]\nuri = \"o\"\npassthrough = [",
        );
        toml += &pass
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(",");
        toml += "]\n[model.inputs]\n";
        for (k, v) in inputs {
            toml += &format!("{k} = \"{v}\"\n");
        }
        toml += "[model.outputs]\n";
        for (k, v) in outputs {
            toml += &format!("{k} = \"{v}\"\n");
        }
        JobSpec::from_toml(&toml).unwrap()
    }

    fn list(t: DataType) -> DataType {
        DataType::List(Arc::new(Field::new("item", t, true)))
    }
    fn fixed(t: DataType, n: i32) -> DataType {
        DataType::FixedSizeList(Arc::new(Field::new("item", t, true)), n)
    }

    fn schema() -> Schema {
        Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("features", fixed(DataType::Float32, 8), true),
            Field::new("ragged", list(DataType::Float32), true),
            Field::new("f64s", fixed(DataType::Float64, 8), true),
            Field::new("small", DataType::Int16, true),
            Field::new("text", DataType::Utf8, true),
        ])
    }

    fn sig(inp: &[(&str, i32, &[i64])], out: &[(&str, i32, &[i64])]) -> ModelSignature {
        ModelSignature::from_onnx_bytes("m", &model_bytes(inp, out)).unwrap()
    }

    #[test]
    fn maps_lists_scalars_and_outputs() {
        let m = sig(
            &[("x", 1, &[-1, 8]), ("s", 7, &[-1])],
            &[("y", 1, &[-1, 3]), ("p", 11, &[-1])],
        );
        let s = spec(
            &[("x", "features"), ("s", "small")],
            &[("y", "logits"), ("p", "prob")],
            &["id"],
        );
        let plan = plan_tensors(&s, &m, &schema(), "f.parquet").unwrap();
        assert_eq!(plan.inputs[1].shape, Shape::Wide { width: Some(8) });
        assert_eq!(plan.inputs[0].shape, Shape::Flat);
        let names: Vec<_> = plan
            .output_schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(names, ["id", "prob", "logits"]);
        assert_eq!(
            plan.output_schema.field(2).data_type(),
            &DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, false)), 3)
        );

        let ragged = spec(&[("x", "ragged"), ("s", "small")], &[("y", "logits")], &[]);
        assert!(plan_tensors(&ragged, &m, &schema(), "f").is_ok());
    }

    #[test]
    fn refusals_name_column_input_and_types() {
        let m = sig(&[("x", 1, &[-1, 8])], &[("y", 1, &[-1, 3])]);
        let cases: Vec<(JobSpec, &[&str])> = vec![
            (
                spec(&[("x", "f64s")], &[("y", "o")], &[]),
                &["f64s", "`x`", "Float64", "float32"],
            ),
            (
                spec(&[("x", "text")], &[("y", "o")], &[]),
                &["text", "`x`", "Utf8"],
            ),
            (
                spec(&[("x", "missing")], &[("y", "o")], &[]),
                &["missing", "f.parquet", "features"],
            ),
            (
                spec(&[("z", "features")], &[("y", "o")], &[]),
                &["`z`", "`x`"],
            ),
            (
                spec(&[("x", "features")], &[("nope", "o")], &[]),
                &["`nope`", "`y`"],
            ),
            (
                spec(&[("x", "features")], &[("y", "o")], &["ghost"]),
                &["ghost"],
            ),
        ];
        for (s, needles) in cases {
            let e = plan_tensors(&s, &m, &schema(), "f.parquet")
                .unwrap_err()
                .to_string();
            for n in needles {
                assert!(e.contains(n), "`{n}` not in: {e}");
            }
        }
        let wide = sig(&[("x", 1, &[-1, 4])], &[("y", 1, &[-1, 3])]);
        let e = plan_tensors(
            &spec(&[("x", "features")], &[("y", "o")], &[]),
            &wide,
            &schema(),
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("wants 4") && e.contains("hold 8"), "{e}");
        let fixed_batch = sig(&[("x", 1, &[1, 8])], &[("y", 1, &[1, 3])]);
        let e = plan_tensors(
            &spec(&[("x", "features")], &[("y", "o")], &[]),
            &fixed_batch,
            &schema(),
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("batch"), "{e}");
        let dyn_out = sig(&[("x", 1, &[-1, 8])], &[("y", 1, &[-1, -1])]);
        let e = plan_tensors(
            &spec(&[("x", "features")], &[("y", "o")], &[]),
            &dyn_out,
            &schema(),
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`y`") && e.contains("not fixed"), "{e}");
        let unmapped = sig(
            &[("x", 1, &[-1, 8]), ("mask", 1, &[-1])],
            &[("y", 1, &[-1, 3])],
        );
        let e = plan_tensors(
            &spec(&[("x", "features")], &[("y", "o")], &[]),
            &unmapped,
            &schema(),
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`mask`") && e.contains("not mapped"), "{e}");
    }

    #[test]
    fn widening_is_lossless_only() {
        assert!(widens(&DataType::Int32, ElemType::I64));
        assert!(widens(&DataType::Float32, ElemType::F64));
        assert!(!widens(&DataType::Int32, ElemType::F32));
        assert!(!widens(&DataType::Float64, ElemType::F32));
        assert!(!widens(&DataType::Int64, ElemType::F64));
        assert!(!widens(&DataType::UInt32, ElemType::I32));
    }
}
