//! How table columns feed model inputs and how model outputs become columns.
//!
//! A FixedSizeList (or a List whose rows all have the model's length) of a numeric type becomes
//! `[batch, D]`; a plain numeric column becomes `[batch]` or `[batch, 1]` as the model declares.
//! Outputs `[batch]` and `[batch, K]` become a plain column and a FixedSizeList<_, K>. Element
//! types must match exactly or widen without loss.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};
use nightshift_proto::{FloatType, JobSpec, OutputTarget, Pool, TextField, TextSpec};

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
    /// `[batch, seq]` of a `[text]` column's tokens: rows of any length, padded with zeros to
    /// the longest row of each model call.
    Tokens(TextField),
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
    /// The model's element type.
    pub elem: ElemType,
    /// None for `[batch]`, Some(K) for `[batch, K]` (and `[batch, seq, K]` pooled).
    pub width: Option<usize>,
    /// How a `[batch, seq, K]` output becomes one vector per row.
    pub pool: Option<Pool>,
    /// L2-normalise each row's vector.
    pub normalize: bool,
    /// The element type the column stores (the model's unless the spec names another).
    pub stored: ElemType,
}

/// Everything the worker needs to turn record batches into tensors and back.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    /// The `[text]` column the worker tokenizes, if the job has one.
    pub text: Option<TextSpec>,
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
        if let Some((text, field)) = (spec.text.as_ref()).and_then(|t| Some((t, t.field(column)?)))
        {
            inputs.push(bind_tokens(sig, text, field, input, input_name)?);
            continue;
        }
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
    for (onnx_name, target) in &spec.model.outputs {
        let Some(sig) = model.output(onnx_name) else {
            return err(format!(
                "[model.outputs] maps `{onnx_name}`, but the model has no output of that name; its outputs are {}",
                known(&model.outputs)
            ));
        };
        outputs.push(bind_output(sig, target)?);
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
        text: spec.text.clone(),
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
    let item = elem_to_arrow(o.stored).unwrap_or(DataType::Float32);
    match o.width {
        None => item,
        Some(k) => DataType::FixedSizeList(Arc::new(Field::new("item", item, false)), k as i32),
    }
}

/// The Arrow type holding a tensor element type, for the types tensors may have.
pub fn elem_to_arrow(e: ElemType) -> Option<DataType> {
    Some(match e {
        ElemType::F16 => DataType::Float16,
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
        ElemType::F16 => matches!(from, Float16),
        ElemType::F32 => matches!(from, Float16 | Float32 | Int8 | Int16 | UInt8 | UInt16),
        ElemType::F64 => matches!(
            from,
            Float16 | Float32 | Float64 | Int8 | Int16 | Int32 | UInt8 | UInt16 | UInt32
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
            "model input type {} is not supported (float16, float32, float64, int32, int64 are)",
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

fn bind_output(sig: &TensorSig, target: &OutputTarget) -> Result<OutputBinding, MappingError> {
    let column = target.column();
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
            "output type {} is not supported (float16, float32, float64, int32, int64 are)",
            sig.elem
        ));
    }
    let is_float = matches!(sig.elem, ElemType::F16 | ElemType::F32 | ElemType::F64);
    if (target.normalize() || target.dtype().is_some()) && !is_float {
        return refuse("`normalize` and `dtype` apply to float outputs only".into());
    }
    let width = match (sig.dims.as_deref(), target.pool()) {
        (Some([_]), None) => None,
        (Some([_, Dim::Fixed(k)]), None) | (Some([_, _, Dim::Fixed(k)]), Some(_)) => {
            Some(*k as usize)
        }
        (Some([_, Dim::Dynamic]), None) | (Some([_, _, Dim::Dynamic]), Some(_)) => {
            return refuse(
                "its last dimension is not fixed, so the column width is unknown".into(),
            );
        }
        (Some([_, _, _]), None) => {
            return refuse(
                "a [batch, seq, hidden] output needs `pool` (mean, cls or max) to become one vector per row".into(),
            );
        }
        (Some(_), Some(_)) => {
            return refuse("`pool` applies to [batch, seq, hidden] outputs only".into());
        }
        (Some(d), None) => {
            return refuse(format!(
                "rank {} outputs are not supported (1 or 2 are, or 3 with `pool`)",
                d.len()
            ));
        }
        (None, _) => return refuse("the model declares no shape for it".into()),
    };
    if target.normalize() && width.is_none() {
        return refuse("`normalize` applies to vector outputs only".into());
    }
    let stored = match target.dtype() {
        None => sig.elem,
        Some(FloatType::Float32) => ElemType::F32,
        Some(FloatType::Float16) => ElemType::F16,
    };
    Ok(OutputBinding {
        onnx_name: sig.name.clone(),
        column: column.to_string(),
        elem: sig.elem,
        width,
        pool: target.pool(),
        normalize: target.normalize(),
        stored,
    })
}

/// A token tensor of the `[text]` column: the column must hold strings, the model input must
/// be `[batch, seq]` of int64 or int32.
fn bind_tokens(
    sig: &TensorSig,
    text: &TextSpec,
    field: TextField,
    input: &Schema,
    input_name: &str,
) -> Result<InputBinding, MappingError> {
    let col = &text.column;
    let Ok(f) = input.field_with_name(col) else {
        return Err(MappingError(format!(
            "[text] column `{col}` is not in `{input_name}`; its columns are {}",
            column_list(input)
        )));
    };
    if !matches!(
        f.data_type(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    ) {
        return Err(MappingError(format!(
            "[text] column `{col}` holds {}, not strings (Utf8 or LargeUtf8)",
            f.data_type()
        )));
    }
    let rank = sig.dims.as_ref().map_or(2, Vec::len);
    if !matches!(sig.elem, ElemType::I64 | ElemType::I32) || rank != 2 {
        return Err(MappingError(format!(
            "model input `{}` ({} {}) cannot take `{col}.{}`: token inputs are [batch, seq] of int64 or int32",
            sig.name,
            sig.elem,
            sig.shape_text(),
            field.suffix()
        )));
    }
    Ok(InputBinding {
        onnx_name: sig.name.clone(),
        column: text.carrier(field),
        elem: sig.elem,
        shape: Shape::Tokens(field),
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

    /// A text spec: `[text] column = "text"`, token inputs, and `outputs` as TOML lines.
    fn text_spec(inputs: &str, outputs: &str) -> JobSpec {
        let toml = format!(
            "name = \"t\"\n[input]\nuri = \"i\"\n[text]\ncolumn = \"text\"\ntokenizer = \"t.json\"\n\
             [model]\nuri = \"m\"\n[model.inputs]\n{inputs}\n[model.outputs]\n{outputs}\n\
             [output]\nuri = \"o\"\npassthrough = [\"id\"]\n"
        );
        JobSpec::from_toml(&toml).unwrap()
    }

    #[test]
    fn text_columns_feed_token_inputs_and_pooled_outputs_become_vectors() {
        let m = sig(
            &[("ids", 7, &[-1, -1]), ("mask", 7, &[-1, -1])],
            &[("h", 10, &[-1, -1, 4])],
        );
        let s = text_spec(
            "ids = \"text.input_ids\"\nmask = \"text.attention_mask\"",
            "h = { column = \"e\", pool = \"mean\", normalize = true, dtype = \"float32\" }",
        );
        let plan = plan_tensors(&s, &m, &schema(), "f").unwrap();
        assert_eq!(plan.inputs[0].shape, Shape::Tokens(TextField::InputIds));
        assert_eq!(plan.inputs[0].column, "text.input_ids");
        assert_eq!(plan.outputs[0].width, Some(4));
        assert_eq!(
            (plan.outputs[0].elem, plan.outputs[0].stored),
            (ElemType::F16, ElemType::F32)
        );
        assert_eq!(
            plan.output_schema.field(1).data_type(),
            &DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, false)), 4)
        );
    }

    #[test]
    fn text_refusals_name_the_column_the_input_or_the_output() {
        let m = |input: (&str, i32, &[i64]), output: &[i64]| sig(&[input], &[("h", 1, output)]);
        let ids = "ids = \"text.input_ids\"";
        let pooled = "h = { column = \"e\", pool = \"cls\" }";
        let cases: [(ModelSignature, JobSpec, &str); 5] = [
            // A float input cannot take token ids.
            (
                m(("ids", 1, &[-1, -1]), &[-1, -1, 4]),
                text_spec(ids, pooled),
                "token inputs are [batch, seq]",
            ),
            // A rank-3 output needs pooling.
            (
                m(("ids", 7, &[-1, -1]), &[-1, -1, 4]),
                text_spec(ids, "h = \"e\""),
                "needs `pool`",
            ),
            // Pooling needs a rank-3 output.
            (
                m(("ids", 7, &[-1, -1]), &[-1, 4]),
                text_spec(ids, pooled),
                "[batch, seq, hidden] outputs only",
            ),
            // The hidden size must be fixed.
            (
                m(("ids", 7, &[-1, -1]), &[-1, -1, -1]),
                text_spec(ids, pooled),
                "not fixed",
            ),
            // int outputs cannot be normalised.
            (
                sig(&[("ids", 7, &[-1, -1])], &[("h", 7, &[-1, 4])]),
                text_spec(ids, "h = { column = \"e\", normalize = true }"),
                "float outputs only",
            ),
        ];
        for (model, spec, says) in cases {
            let e = plan_tensors(&spec, &model, &schema(), "f").unwrap_err();
            assert!(e.0.contains(says), "{e}");
        }
        // The text column must be there and hold strings.
        let model = m(("ids", 7, &[-1, -1]), &[-1, -1, 4]);
        let missing = Schema::new(vec![Field::new("id", DataType::Int64, false)]);
        let e = plan_tensors(&text_spec(ids, pooled), &model, &missing, "f").unwrap_err();
        assert!(e.0.contains("[text] column `text` is not in `f`"), "{e}");
        let numbers = Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("text", DataType::Int64, true),
        ]);
        let e = plan_tensors(&text_spec(ids, pooled), &model, &numbers, "f").unwrap_err();
        assert!(e.0.contains("not strings"), "{e}");
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
