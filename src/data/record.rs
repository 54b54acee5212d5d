//! One way to declare a record that prefcap stores as a row of a Parquet table: [`record!`]
//! writes the struct, its Arrow schema (one column per field, named as the field, nullable
//! when the field is an `Option`) and its (de)serialisation. The declarations themselves, the
//! on-disk contract between stages, are in [`crate::data::records`].

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryArray, BinaryBuilder, Float64Array, Int32Array, Int64Array, RecordBatch,
    StringArray, UInt32Array,
};
use arrow::datatypes::{DataType, SchemaRef};

use crate::error::{Error, Result};

/// A type stored one row per record in Parquet tables. Implemented by [`record!`].
pub trait Record: Sized + Send + 'static {
    /// Arrow schema of a table of these records.
    fn schema() -> SchemaRef;
    /// Columnar form of `rows`, in order.
    fn to_batch(rows: &[Self]) -> Result<RecordBatch>;
    /// Rows of `batch`; `path` names the file in errors.
    fn from_batch(batch: &RecordBatch, path: &Path) -> Result<Vec<Self>>;
}

/// A field type and the Arrow column that stores it.
pub trait Column: Sized {
    /// Whether the column may hold nulls (the field is an `Option`).
    const NULLABLE: bool;
    fn data_type() -> DataType;
    /// The column of `values`, in order.
    fn to_array<'a>(values: impl ExactSizeIterator<Item = &'a Self>) -> ArrayRef
    where
        Self: 'a;
    /// The values of `array`; `Err` says what is wrong with it (type, null, bad value).
    fn from_array(array: &dyn Array) -> std::result::Result<Vec<Self>, String>;
}

/// Declares a record: a struct whose fields are [`Column`]s, with `Debug`, `Clone`,
/// `PartialEq` and `Serialize`, and its [`Record`] implementation.
macro_rules! record {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$field_meta:meta])* pub $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, ::serde::Serialize)]
        pub struct $name {
            $( $(#[$field_meta])* pub $field: $ty ),*
        }

        impl $crate::data::record::Record for $name {
            fn schema() -> ::arrow::datatypes::SchemaRef {
                ::std::sync::Arc::new(::arrow::datatypes::Schema::new(vec![$(
                    ::arrow::datatypes::Field::new(
                        stringify!($field),
                        <$ty as $crate::data::record::Column>::data_type(),
                        <$ty as $crate::data::record::Column>::NULLABLE,
                    )
                ),*]))
            }

            fn to_batch(rows: &[Self]) -> $crate::error::Result<::arrow::array::RecordBatch> {
                $crate::data::record::batch(
                    Self::schema(),
                    vec![$(
                        <$ty as $crate::data::record::Column>::to_array(rows.iter().map(|r| &r.$field))
                    ),*],
                )
            }

            fn from_batch(
                batch: &::arrow::array::RecordBatch,
                path: &::std::path::Path,
            ) -> $crate::error::Result<Vec<Self>> {
                $(
                    let mut $field =
                        $crate::data::record::read_column::<$ty>(batch, stringify!($field), path)?
                            .into_iter();
                )*
                Ok((0..batch.num_rows())
                    .filter_map(|_| Some(Self { $( $field: $field.next()? ),* }))
                    .collect())
            }
        }
    };
}
pub(crate) use record;

/// The values of column `name` of `batch` as `T`; the error names the file and the column.
pub fn read_column<T: Column>(batch: &RecordBatch, name: &str, path: &Path) -> Result<Vec<T>> {
    let bad = |message: String| Error::BadFile {
        path: path.to_path_buf(),
        message,
    };
    let array = batch
        .column_by_name(name)
        .ok_or_else(|| bad(format!("missing column `{name}`")))?;
    let values = T::from_array(array.as_ref()).map_err(|m| bad(format!("column `{name}` {m}")))?;
    if values.len() != batch.num_rows() {
        return Err(bad(format!(
            "column `{name}` has {} values for {} rows",
            values.len(),
            batch.num_rows()
        )));
    }
    Ok(values)
}

/// A batch of `columns` under `schema`.
pub fn batch(schema: SchemaRef, columns: Vec<ArrayRef>) -> Result<RecordBatch> {
    RecordBatch::try_new(schema, columns).map_err(|source| Error::Arrow {
        context: "building a record batch".into(),
        source,
    })
}

fn downcast<'a, A: Array + 'static>(
    array: &'a dyn Array,
    expected: &DataType,
) -> std::result::Result<&'a A, String> {
    array
        .as_any()
        .downcast_ref::<A>()
        .ok_or_else(|| format!("has type {}, expected {expected}", array.data_type()))
}

fn no_nulls(array: &dyn Array) -> std::result::Result<(), String> {
    match array.null_count() {
        0 => Ok(()),
        n => Err(format!("has {n} null value(s) but is not nullable")),
    }
}

macro_rules! primitive_column {
    ($t:ty, $array:ty, $data_type:expr) => {
        impl Column for $t {
            const NULLABLE: bool = false;
            fn data_type() -> DataType {
                $data_type
            }
            fn to_array<'a>(values: impl ExactSizeIterator<Item = &'a Self>) -> ArrayRef {
                Arc::new(<$array>::from_iter_values(values.copied()))
            }
            fn from_array(array: &dyn Array) -> std::result::Result<Vec<Self>, String> {
                let a = downcast::<$array>(array, &$data_type)?;
                no_nulls(a)?;
                Ok(a.values().to_vec())
            }
        }

        impl Column for Option<$t> {
            const NULLABLE: bool = true;
            fn data_type() -> DataType {
                $data_type
            }
            fn to_array<'a>(values: impl ExactSizeIterator<Item = &'a Self>) -> ArrayRef {
                Arc::new(values.copied().collect::<$array>())
            }
            fn from_array(array: &dyn Array) -> std::result::Result<Vec<Self>, String> {
                Ok(downcast::<$array>(array, &$data_type)?.iter().collect())
            }
        }
    };
}

primitive_column!(f64, Float64Array, DataType::Float64);
primitive_column!(i32, Int32Array, DataType::Int32);
primitive_column!(i64, Int64Array, DataType::Int64);
primitive_column!(u32, UInt32Array, DataType::UInt32);

impl Column for String {
    const NULLABLE: bool = false;
    fn data_type() -> DataType {
        DataType::Utf8
    }
    fn to_array<'a>(values: impl ExactSizeIterator<Item = &'a Self>) -> ArrayRef {
        Arc::new(StringArray::from_iter_values(values))
    }
    fn from_array(array: &dyn Array) -> std::result::Result<Vec<Self>, String> {
        let a = downcast::<StringArray>(array, &DataType::Utf8)?;
        no_nulls(a)?;
        Ok(a.iter()
            .map(|v| v.unwrap_or_default().to_string())
            .collect())
    }
}

impl Column for Option<String> {
    const NULLABLE: bool = true;
    fn data_type() -> DataType {
        DataType::Utf8
    }
    fn to_array<'a>(values: impl ExactSizeIterator<Item = &'a Self>) -> ArrayRef {
        Arc::new(values.map(Option::as_deref).collect::<StringArray>())
    }
    fn from_array(array: &dyn Array) -> std::result::Result<Vec<Self>, String> {
        let a = downcast::<StringArray>(array, &DataType::Utf8)?;
        Ok(a.iter().map(|v| v.map(str::to_string)).collect())
    }
}

/// Binary columns: built with their total size known, so the bytes are copied once.
fn binary_array<'a>(values: impl ExactSizeIterator<Item = Option<&'a [u8]>> + Clone) -> ArrayRef {
    let bytes = values.clone().map(|v| v.map_or(0, <[u8]>::len)).sum();
    let mut builder = BinaryBuilder::with_capacity(values.len(), bytes);
    for v in values {
        builder.append_option(v);
    }
    Arc::new(builder.finish())
}

impl Column for Vec<u8> {
    const NULLABLE: bool = false;
    fn data_type() -> DataType {
        DataType::Binary
    }
    fn to_array<'a>(values: impl ExactSizeIterator<Item = &'a Self>) -> ArrayRef {
        let values: Vec<Option<&[u8]>> = values.map(|v| Some(v.as_slice())).collect();
        binary_array(values.into_iter())
    }
    fn from_array(array: &dyn Array) -> std::result::Result<Vec<Self>, String> {
        let a = downcast::<BinaryArray>(array, &DataType::Binary)?;
        no_nulls(a)?;
        Ok(a.iter().map(|v| v.unwrap_or_default().to_vec()).collect())
    }
}

impl Column for Option<Vec<u8>> {
    const NULLABLE: bool = true;
    fn data_type() -> DataType {
        DataType::Binary
    }
    fn to_array<'a>(values: impl ExactSizeIterator<Item = &'a Self>) -> ArrayRef {
        let values: Vec<Option<&[u8]>> = values.map(Option::as_deref).collect();
        binary_array(values.into_iter())
    }
    fn from_array(array: &dyn Array) -> std::result::Result<Vec<Self>, String> {
        let a = downcast::<BinaryArray>(array, &DataType::Binary)?;
        Ok(a.iter().map(|v| v.map(<[u8]>::to_vec)).collect())
    }
}
