//! The graph inputs and outputs of an ONNX model, decoded from its protobuf with only the
//! fields we need (weights and nodes are skipped, not copied).

use std::fmt;

use prost::Message;

#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("`{uri}` is not an ONNX model: {reason}")]
    NotOnnx { uri: String, reason: String },
}

/// Tensor element types, numbered as in onnx.proto.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemType {
    F32,
    U8,
    I8,
    U16,
    I16,
    I32,
    I64,
    Str,
    Bool,
    F16,
    F64,
    U32,
    U64,
    Other(i32),
}

impl ElemType {
    pub fn from_onnx(code: i32) -> Self {
        match code {
            1 => ElemType::F32,
            2 => ElemType::U8,
            3 => ElemType::I8,
            4 => ElemType::U16,
            5 => ElemType::I16,
            6 => ElemType::I32,
            7 => ElemType::I64,
            8 => ElemType::Str,
            9 => ElemType::Bool,
            10 => ElemType::F16,
            11 => ElemType::F64,
            12 => ElemType::U32,
            13 => ElemType::U64,
            other => ElemType::Other(other),
        }
    }
}

impl fmt::Display for ElemType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ElemType::F32 => "float32",
            ElemType::U8 => "uint8",
            ElemType::I8 => "int8",
            ElemType::U16 => "uint16",
            ElemType::I16 => "int16",
            ElemType::I32 => "int32",
            ElemType::I64 => "int64",
            ElemType::Str => "string",
            ElemType::Bool => "bool",
            ElemType::F16 => "float16",
            ElemType::F64 => "float64",
            ElemType::U32 => "uint32",
            ElemType::U64 => "uint64",
            ElemType::Other(c) => return write!(f, "onnx type {c}"),
        };
        f.write_str(s)
    }
}

/// One dimension of a declared shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    /// Symbolic (`batch`) or unnamed.
    Dynamic,
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Dynamic => f.write_str("?"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSig {
    pub name: String,
    pub elem: ElemType,
    /// None when the model declares no shape.
    pub dims: Option<Vec<Dim>>,
}

impl TensorSig {
    pub fn shape_text(&self) -> String {
        match &self.dims {
            Some(d) => format!(
                "[{}]",
                d.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => "[unknown]".into(),
        }
    }
}

/// The graph inputs (initializers excluded) and outputs of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSignature {
    pub inputs: Vec<TensorSig>,
    pub outputs: Vec<TensorSig>,
}

impl ModelSignature {
    pub fn from_onnx_bytes(uri: &str, bytes: &[u8]) -> Result<Self, SignatureError> {
        let not_onnx = |reason: String| SignatureError::NotOnnx {
            uri: uri.to_string(),
            reason,
        };
        let model = ModelProto::decode(bytes).map_err(|e| not_onnx(e.to_string()))?;
        if model.ir_version <= 0 {
            return Err(not_onnx("no IR version".into()));
        }
        let graph = model.graph.ok_or_else(|| not_onnx("no graph".into()))?;
        if graph.output.is_empty() {
            return Err(not_onnx("the graph has no outputs".into()));
        }
        let initializers: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let sig = |v: &ValueInfoProto| {
            let tensor = v.r#type.as_ref().and_then(|t| t.tensor_type.as_ref());
            TensorSig {
                name: v.name.clone(),
                elem: tensor
                    .map(|t| ElemType::from_onnx(t.elem_type))
                    .unwrap_or(ElemType::Other(0)),
                dims: tensor.and_then(|t| t.shape.as_ref()).map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match d.dim_value {
                            Some(n) if n > 0 => Dim::Fixed(n),
                            _ => Dim::Dynamic,
                        })
                        .collect()
                }),
            }
        };
        Ok(ModelSignature {
            inputs: graph
                .input
                .iter()
                .filter(|i| !initializers.contains(&i.name.as_str()))
                .map(sig)
                .collect(),
            outputs: graph.output.iter().map(sig).collect(),
        })
    }

    pub fn input(&self, name: &str) -> Option<&TensorSig> {
        self.inputs.iter().find(|t| t.name == name)
    }

    pub fn output(&self, name: &str) -> Option<&TensorSig> {
        self.outputs.iter().find(|t| t.name == name)
    }
}

// The subset of onnx.proto that carries the signature; every other field is skipped.

#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(int64, tag = "1")]
    ir_version: i64,
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
}

#[derive(Clone, PartialEq, Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<NamedTensorProto>,
    #[prost(message, repeated, tag = "11")]
    input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    output: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, Message)]
struct NamedTensorProto {
    #[prost(string, tag = "8")]
    name: String,
}

#[derive(Clone, PartialEq, Message)]
struct ValueInfoProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "2")]
    r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TypeProto {
    #[prost(message, optional, tag = "1")]
    tensor_type: Option<TensorTypeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorTypeProto {
    #[prost(int32, tag = "1")]
    elem_type: i32,
    #[prost(message, optional, tag = "2")]
    shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    dim: Vec<DimensionProto>,
}

#[derive(Clone, PartialEq, Message)]
struct DimensionProto {
    #[prost(int64, optional, tag = "1")]
    dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    dim_param: Option<String>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Encodes a tiny model proto with the given inputs/outputs, for tests.
    pub fn model_bytes(inputs: &[(&str, i32, &[i64])], outputs: &[(&str, i32, &[i64])]) -> Vec<u8> {
        let vi = |(name, elem, dims): &(&str, i32, &[i64])| ValueInfoProto {
            name: name.to_string(),
            r#type: Some(TypeProto {
                tensor_type: Some(TensorTypeProto {
                    elem_type: *elem,
                    shape: Some(TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| DimensionProto {
                                dim_value: (d > 0).then_some(d),
                                dim_param: (d <= 0).then(|| "batch".to_string()),
                            })
                            .collect(),
                    }),
                }),
            }),
        };
        ModelProto {
            ir_version: 8,
            graph: Some(GraphProto {
                initializer: vec![NamedTensorProto { name: "w".into() }],
                input: inputs
                    .iter()
                    .map(vi)
                    .chain(std::iter::once(vi(&("w", 1, &[4]))))
                    .collect(),
                output: outputs.iter().map(vi).collect(),
            }),
        }
        .encode_to_vec()
    }

    #[test]
    fn reads_inputs_and_outputs_without_initializers() {
        let bytes = model_bytes(&[("x", 1, &[-1, 8])], &[("y", 1, &[-1, 3])]);
        let sig = ModelSignature::from_onnx_bytes("m.onnx", &bytes).unwrap();
        assert_eq!(sig.inputs.len(), 1);
        assert_eq!(sig.inputs[0].name, "x");
        assert_eq!(sig.inputs[0].elem, ElemType::F32);
        assert_eq!(sig.inputs[0].shape_text(), "[?, 8]");
        assert_eq!(
            sig.output("y").unwrap().dims.as_ref().unwrap()[1],
            Dim::Fixed(3)
        );
    }

    #[test]
    fn refuses_non_onnx_bytes() {
        for junk in [&b"PAR1 not a model at all"[..], b"", b"\x08\x00"] {
            let e = ModelSignature::from_onnx_bytes("junk.bin", junk).unwrap_err();
            assert!(e.to_string().contains("junk.bin"), "{e}");
            assert!(e.to_string().contains("not an ONNX model"), "{e}");
        }
    }
}
